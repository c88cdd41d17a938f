from chassis.service import main
from services.cards.server import definition

main(definition)
